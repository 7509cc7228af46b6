"""The compiler passes, one per module (installed as ``actcompile.passes``); see README.md here."""
