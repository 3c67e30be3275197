"""Dense-to-MoE conversion: read a dense Llama (GGUF or safetensors), split its FFNs into experts,
fit routers, write a moeflow checkpoint."""
