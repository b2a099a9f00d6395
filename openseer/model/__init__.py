"""Backbone (timm) and the SwAV meta-architecture."""
