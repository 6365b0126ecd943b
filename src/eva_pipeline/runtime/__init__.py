"""Process plumbing shared by training and target extraction: devices and the multi-process launch."""
