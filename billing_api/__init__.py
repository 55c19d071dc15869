"""The billing API: users buy plans through Stripe and their quota follows."""
