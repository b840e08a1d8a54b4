# The job queue (kidp.queues.pubsub): one topic, one push subscription to the
# jobs function whose dead-letter policy is KIDP_JOB_MAX_DELIVERIES, and the
# dead-letter topic with the pull subscription the dlq function reads.

resource "google_pubsub_topic" "jobs" {
  name                       = "${var.name}-jobs"
  kms_key_name               = google_kms_crypto_key.broker.id
  labels                     = local.infra_labels
  message_retention_duration = "86400s"
  depends_on                 = [google_project_service.apis, google_kms_crypto_key_iam_member.agents]
}

resource "google_pubsub_topic" "dead" {
  name                       = "${var.name}-jobs-dead"
  kms_key_name               = google_kms_crypto_key.broker.id
  labels                     = local.infra_labels
  message_retention_duration = "604800s"
  depends_on                 = [google_project_service.apis, google_kms_crypto_key_iam_member.agents]
}

resource "google_pubsub_subscription" "jobs" {
  name   = "${var.name}-jobs-push"
  topic  = google_pubsub_topic.jobs.id
  labels = local.infra_labels

  # As long as the function may take: no second delivery while one runs.
  ack_deadline_seconds       = local.functions.jobs.timeout
  message_retention_duration = "86400s"

  push_config {
    push_endpoint = google_cloudfunctions2_function.function["jobs"].service_config[0].uri

    oidc_token {
      service_account_email = google_service_account.push.email
      audience              = google_cloudfunctions2_function.function["jobs"].service_config[0].uri
    }
  }

  # Counted deliveries: Pub/Sub sends deliveryAttempt with every push, and the
  # jobs function fails a deployment itself on the last one (kidp.edges.gcp).
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead.id
    max_delivery_attempts = var.job_max_deliveries
  }

  # Only for deliveries the function did not answer (it was killed) or
  # answered 5xx (it could not schedule a retry); retries it decides itself
  # are Cloud Tasks copies with the broker's own delays.
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "300s"
  }

  expiration_policy {
    ttl = ""
  }
}

# Dead jobs wait here for an operator (the dlq function lists and redrives
# them) for 31 days, the longest Pub/Sub keeps a subscription's messages.
resource "google_pubsub_subscription" "dead" {
  name                       = "${var.name}-jobs-dead"
  topic                      = google_pubsub_topic.dead.id
  labels                     = local.infra_labels
  ack_deadline_seconds       = 60
  message_retention_duration = "2678400s"
  retain_acked_messages      = false

  expiration_policy {
    ttl = ""
  }
}
