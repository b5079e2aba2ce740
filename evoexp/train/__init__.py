"""Training compressed models in place: the masked AdamW both DarwinLM's candidate fine-tuning
(`evoexp.search.training`) and post-compression training (`posttrain.py`) use."""
