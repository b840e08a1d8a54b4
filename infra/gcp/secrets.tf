# The broker's two keys, read by every function as KIDP_JWT_SECRET and
# KIDP_CALLBACK_SECRET. Their values never enter Terraform (or its state):
#   openssl rand -hex 32 | gcloud secrets versions add kidp-jwt-secret --data-file=-
#   echo "whsec_$(openssl rand -base64 32)" | gcloud secrets versions add kidp-callback-secret --data-file=-
resource "google_secret_manager_secret" "key" {
  for_each  = { jwt = "jwt-secret", callback = "callback-secret" }
  secret_id = "${var.name}-${each.value}"
  labels    = local.infra_labels

  replication {
    auto {}
  }

  depends_on = [google_project_service.apis]
}
