"""Plug minillm into code that already runs: Hugging Face transformers (`minillm.integrations.transformers`)."""
