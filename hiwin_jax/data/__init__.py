"""Host-side data code (numpy/PIL/grain, no jax): slicing, images, text, token layout, and the
training loader (`loader.make_train_iterator`)."""
