"""Research tools outside the tokenizer's import path: quantized-weight layers and the
estimator surrogates of the estimator study (``notebooks/estimators.ipynb``). Nothing in
training, tokenizing or generating imports them."""
