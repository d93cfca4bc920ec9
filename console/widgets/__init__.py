"""Widgets and cell formatters shared by the dashboard's screens."""
