"""Contrastive and SigLIP losses: torch, C++ and (GPU-marked) Triton paths, sharded over
process groups, autocast, differences from open_clip, memory."""
