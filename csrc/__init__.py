# C++/CUDA sources shipped as package data so clip_fast/_ext.py can compile them on first use.
