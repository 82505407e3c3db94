"""Instruction data: built-in task generator and loaders."""
