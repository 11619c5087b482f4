"""Model factory over timm."""
