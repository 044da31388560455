"""The builder: photo → avatar, in stages (detect → align → gaussians)."""
