"""Placeholder replaced by the CLI module."""
import typer

app = typer.Typer()
