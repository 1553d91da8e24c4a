"""lmi-hf: the HuggingFace transformers + accelerate engine backend for lmi-core."""
