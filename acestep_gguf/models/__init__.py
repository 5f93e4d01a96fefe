"""What each supported architecture looks like: tensor-name tables and hyper-parameter keys."""
