"""Example luminagrid operations, registered under the entry-point group `luminagrid.ops`:
`median` (cv2.medianBlur) and `morph` (cv2.morphologyEx: open, close, gradient)."""
