"""Training as jobs: built-in architectures trained from scratch on uploaded datasets."""
