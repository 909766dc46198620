"""The seed's module name for extraction (`from minillm.training.model_extraction import ...`)."""
from minillm.training.extraction import continue_training, extract_model_for_inference, load_model_and_tokenizer

__all__ = ["load_model_and_tokenizer", "continue_training", "extract_model_for_inference"]
