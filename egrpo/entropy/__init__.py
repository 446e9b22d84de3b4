"""AEGPO's attention-entropy probes for FLUX and SD3 transformers (plain torch; see `attention`)."""
