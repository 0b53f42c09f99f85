"""Fine-tuning EVE for VQA v2, NLVR2 and image-text retrieval."""
