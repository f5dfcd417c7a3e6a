"""What inputs and outputs mean per task: images, texts, labels, embeddings."""
