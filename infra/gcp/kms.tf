# The key the job topics are encrypted with (messages carry deployment ids and
# callback event ids, never credentials, but they are the broker's state).
resource "google_kms_key_ring" "broker" {
  name       = "${var.name}-broker"
  location   = var.region
  depends_on = [google_project_service.apis]
}

resource "google_kms_crypto_key" "broker" {
  name            = "${var.name}-broker"
  key_ring        = google_kms_key_ring.broker.id
  rotation_period = "7776000s"
  labels          = local.infra_labels

  lifecycle {
    prevent_destroy = true
  }
}

# Pub/Sub encrypts and decrypts with it on the topics' behalf.
resource "google_kms_crypto_key_iam_member" "agents" {
  crypto_key_id = google_kms_crypto_key.broker.id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = local.pubsub_agent
}
