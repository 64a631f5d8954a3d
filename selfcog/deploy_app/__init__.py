"""Files `selfcog deploy` copies into an app bundle. Read as text, never imported."""
