"""Renderers: every table, CSV and plot is made from results.json alone."""
