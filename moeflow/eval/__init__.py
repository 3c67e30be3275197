"""Quality and routing measurements over text: perplexity and routing traces."""
