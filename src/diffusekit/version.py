"""The package version, in a module of its own so that every layer can read it without importing the
package root (which would tie a lower layer to the whole public surface)."""
__version__ = "0.1.0"
