variable "project_id" {
  description = "The project the broker runs in and provisions into."
  type        = string
}

variable "region" {
  description = "The region of the functions, the queue, the store; the broker's KIDP_REGION."
  type        = string
  default     = "europe-west1"
}

variable "name" {
  description = "Prefix of every resource name (service accounts allow 6 to 30 characters in all)."
  type        = string
  default     = "kidp"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,14}$", var.name))
    error_message = "name: lowercase letters, digits and '-', at most 15 characters, starting with a letter."
  }
}

variable "source_archive" {
  description = "The functions' source: the zip scripts/build-gcp.sh writes (gcp/main.py, the kidp package, requirements.txt)."
  type        = string
  default     = "../../build/gcp/function-source.zip"
}

variable "job_max_deliveries" {
  description = "Deliveries of one job before it is given up: the jobs subscription's dead-letter policy and KIDP_JOB_MAX_DELIVERIES (Pub/Sub accepts 5 to 100). A push Cloud Run throttles (429: every jobs instance busy) counts as a delivery, so this is high enough to outlast a burst: with the subscription's backoff (10 s doubling to 300 s) 19 throttles in a row take about an hour."
  type        = number
  default     = 20

  validation {
    condition     = var.job_max_deliveries >= 5 && var.job_max_deliveries <= 100
    error_message = "Pub/Sub's dead-letter policy accepts 5 to 100 delivery attempts."
  }
}

variable "callback_allowlist" {
  description = "Hosts or CIDRs callbacks may reach despite the SSRF rules (KIDP_CALLBACK_ALLOWLIST)."
  type        = list(string)
  default     = []
}

variable "tag_prefix" {
  description = "Prefix of the five tags (KIDP_TAG_PREFIX); GCP labels get it in their own alphabet."
  type        = string
  default     = "platform.company.com/"
}

variable "managed_by" {
  description = "The managed-by tag's value (KIDP_MANAGED_BY)."
  type        = string
  default     = "kidp"
}

variable "log_level" {
  description = "KIDP_LOG_LEVEL of every function."
  type        = string
  default     = "INFO"
}

variable "api_invokers" {
  description = "Who may call the api function through Cloud Run's IAM check. The broker checks its own bearer tokens on every route, so callers outside Google (the platform's operator, CI) need allUsers here."
  type        = list(string)
  default     = ["allUsers"]
}

variable "operators" {
  description = "Who may call the dlq function (IAM members, e.g. group:platform-oncall@example.com); they also need a broker token for every namespace."
  type        = list(string)
  default     = []
}

variable "database_tier" {
  description = "The Cloud SQL machine type of the store (an Enterprise edition tier: db-custom-<vCPUs>-<MB>). 2 vCPUs and 7.5 GB, whose default max_connections is 200: the functions' pools at full scale-out need 164."
  type        = string
  default     = "db-custom-2-7680"
}

variable "database_max_connections" {
  description = "The store's max_connections flag: at least the functions' connections at full scale-out plus 20 (terraform plan checks it). Cloud SQL's default for the tier's memory is a safe value: 100 for 3.75 GB, 200 for 7.5 GB."
  type        = number
  default     = 200
}

variable "deletion_protection" {
  description = "Protect the store's instance from terraform destroy."
  type        = bool
  default     = true
}

variable "provider_roles" {
  description = "Predefined project roles each function needs for the cloud resources the broker provisions (the GCP provider): the api and scan read, the jobs function creates and deletes. Bucket reading and the scan's password rotation are custom roles of iam.tf; grants of roles/cloudsql.admin and roles/storage.admin are held to kidp-* resources other than the broker's own (iam.tf)."
  type        = map(list(string))
  default = {
    api = [
      "roles/cloudsql.viewer",
      "roles/redis.viewer",
      "roles/pubsub.viewer",
      "roles/run.viewer",
    ]
    jobs = [
      "roles/cloudsql.admin",
      "roles/redis.admin",
      "roles/pubsub.editor",
      "roles/storage.admin",
      "roles/run.developer",
    ]
    scan = [
      "roles/cloudsql.viewer",
      "roles/redis.viewer",
      "roles/pubsub.viewer",
      "roles/run.viewer",
    ]
    dlq = []
  }
}
