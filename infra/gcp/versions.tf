# The broker on Google Cloud: four Cloud Functions (2nd gen), the Pub/Sub job
# queue with its dead-letter topic, Cloud Tasks for delayed jobs, Cloud
# Scheduler for the scans, Cloud SQL for PostgreSQL for the store, Secret
# Manager for the broker's keys and the deployments' credentials.
terraform {
  required_version = ">= 1.6"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.10, < 8"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}
