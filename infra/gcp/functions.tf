# The four functions of gcp/main.py. Each runs as its own service account with
# the KIDP_* settings of locals.environment, its own store URL, and the
# broker's two keys from Secret Manager.
resource "google_cloudfunctions2_function" "function" {
  #checkov:skip=CKV_GCP_124:Only api and dlq allow all ingress: api serves callers outside Google (the platform's operator, CI) and checks the broker's own bearer tokens on every route; dlq serves operators behind Cloud Run IAM plus a broker token for every namespace. jobs and scan take internal traffic only.
  for_each    = local.functions
  name        = "${var.name}-${each.key}"
  location    = var.region
  description = each.value.description
  labels      = local.infra_labels

  build_config {
    runtime     = "python312"
    entry_point = each.key

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    service_account_email            = google_service_account.function[each.key].email
    available_memory                 = each.value.memory
    available_cpu                    = each.value.cpu
    max_instance_request_concurrency = each.value.concurrency
    timeout_seconds                  = each.value.timeout
    max_instance_count               = each.value.max_instances
    ingress_settings                 = each.value.ingress
    all_traffic_on_latest_revision   = true

    environment_variables = merge(local.environment, {
      KIDP_STORE_URL = local.store_urls[each.key]
      # functions-framework's request threads (else 4 per CPU it sees): as
      # many as the requests Cloud Run sends an instance at once.
      THREADS = tostring(each.value.concurrency)
    })

    secret_environment_variables {
      key        = "KIDP_JWT_SECRET"
      project_id = var.project_id
      secret     = google_secret_manager_secret.key["jwt"].secret_id
      version    = "latest"
    }

    secret_environment_variables {
      key        = "KIDP_CALLBACK_SECRET"
      project_id = var.project_id
      secret     = google_secret_manager_secret.key["callback"].secret_id
      version    = "latest"
    }
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.keys,
    google_project_iam_member.sql_login,
  ]
}
