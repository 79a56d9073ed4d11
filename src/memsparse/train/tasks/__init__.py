"""Training and evaluation tasks: RULER NIAH, generative retrieval, question answering."""
