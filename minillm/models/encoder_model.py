"""The seed's module name for the encoder (`from minillm.models.encoder_model import EncoderOnlyModel`)."""
from minillm.models.encoder import EncoderOnlyModel, MLMHead, pool

__all__ = ["EncoderOnlyModel", "MLMHead", "pool"]
