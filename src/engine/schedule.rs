//! Cron schedules of deployments: standard 5-field expressions (or 6 with seconds) in an IANA
//! time zone, validated and turned into the next run time.
