"""Pure tensor functions: RoPE, chunk pooling, routing scores and top-k, document-masked attention."""
