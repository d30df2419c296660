"""The demo's world: synthetic captioned scenes, training the shipped small teacher, and the held-out scene table."""
