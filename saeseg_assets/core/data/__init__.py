"""Data in: the ADE20K reader, the embedded demo set, backbones, recording and the activation caches."""
