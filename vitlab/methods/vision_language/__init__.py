"""Chapter 7: vision-language at toy scale, on the shared core in ``vitlab.vlm``."""
