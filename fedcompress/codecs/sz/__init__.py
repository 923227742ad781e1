"""SZ-style error-bounded lossy codec: prequantize -> predict -> codes/outliers -> entropy -> lossless."""
