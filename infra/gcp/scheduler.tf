# The scans (kidp.scans): Cloud Scheduler calls the scan function with
# {"scan": "<name>"}, as the scheduler service account (OIDC).
resource "google_cloud_scheduler_job" "scan" {
  for_each         = local.scans
  name             = "${var.name}-scan-${each.key}"
  description      = "KIDP broker: the ${each.key} scan"
  region           = var.region
  schedule         = each.value
  time_zone        = "Etc/UTC"
  attempt_deadline = "${local.functions.scan.timeout}s"

  retry_config {
    retry_count          = 1
    min_backoff_duration = "30s"
  }

  http_target {
    http_method = "POST"
    uri         = google_cloudfunctions2_function.function["scan"].service_config[0].uri
    body        = base64encode(jsonencode({ scan = each.key }))
    headers = {
      "Content-Type" = "application/json"
    }

    oidc_token {
      service_account_email = google_service_account.scheduler.email
      audience              = google_cloudfunctions2_function.function["scan"].service_config[0].uri
    }
  }

  depends_on = [google_project_service.apis]
}
