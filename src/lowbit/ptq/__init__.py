"""Post-training quantization methods that keep low-bit models near float without retraining."""
