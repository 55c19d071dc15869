"""What the quota gateway's services share: settings, plans, schema, Redis layout and scripts."""
