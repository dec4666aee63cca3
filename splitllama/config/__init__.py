"""Typed configuration: the one source of defaults (import the submodules: model, parallel, job, ...)."""
