"""Pretraining: mixing methods, saliency detectors, pairing, the training engine, presets."""
