"""Trainable adapters on quantized layers (LoRA through PEFT, QWHA's Walsh-Hadamard adapter)."""
