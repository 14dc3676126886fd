"""Typer commands only: parse, call, render. Logic worth testing lives in the packages they call."""
