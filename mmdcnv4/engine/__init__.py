"""Training-side pieces: the layer-decay optimizer constructor (importing registers it)."""
from .layer_decay_optimizer_constructor import CustomLayerDecayOptimizerConstructor

__all__ = ['CustomLayerDecayOptimizerConstructor']
