"""`python -m papeft.backbone NAME`: dequantise and cache a backbone once (scripts/setup.sh)."""
from papeft.backbone.loading import main

main()
