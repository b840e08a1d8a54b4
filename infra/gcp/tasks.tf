# Delayed jobs (kidp.queues.cloudtasks): each task publishes one job to the jobs
# topic through Pub/Sub's REST API, as the tasks service account, when due.
resource "google_cloud_tasks_queue" "delays" {
  name     = "${var.name}-delays"
  location = var.region

  rate_limits {
    max_dispatches_per_second = 100
    max_concurrent_dispatches = 100
  }

  # A publish that fails is retried by Cloud Tasks; the job is not lost.
  retry_config {
    max_attempts       = 100
    min_backoff        = "1s"
    max_backoff        = "60s"
    max_doublings      = 5
    max_retry_duration = "86400s"
  }

  stackdriver_logging_config {
    sampling_ratio = 1.0
  }

  depends_on = [google_project_service.apis]
}
