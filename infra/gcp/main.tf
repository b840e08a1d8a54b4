data "google_project" "this" {
  project_id = var.project_id
}

resource "google_project_service" "apis" {
  for_each = toset([
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "cloudkms.googleapis.com",
    "cloudscheduler.googleapis.com",
    "cloudtasks.googleapis.com",
    "iam.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "secretmanager.googleapis.com",
    "sqladmin.googleapis.com",
  ])
  service = each.value
  # Other workloads of the project may use them too.
  disable_on_destroy = false
}

locals {
  # The four functions, by the name of their entry point in gcp/main.py.
  # store_connections is each instance's cap on connections to the store
  # (max_connections in its KIDP_STORE_URL): requests beyond it wait for a
  # pooled one. Every instance of every function at its cap must fit the
  # store's max_connections (sql.tf checks it).
  functions = {
    api = {
      description       = "The broker's HTTP API (every route), behind its own bearer tokens."
      memory            = "1Gi"
      cpu               = "1"
      concurrency       = 8
      timeout           = 60
      max_instances     = 20
      store_connections = 3
      ingress           = "ALLOW_ALL"
    }
    jobs = {
      description = "Provision, poll, delete and callback jobs, pushed by the jobs subscription."
      # A job mostly waits on Google's APIs: 8 at a time per instance, on 2
      # vCPUs. Beyond 8 x max_instances jobs in flight Cloud Run answers a
      # push 429, which Pub/Sub counts as a delivery (see job_max_deliveries).
      memory            = "2Gi"
      cpu               = "2"
      concurrency       = 8
      timeout           = 540
      max_instances     = 30
      store_connections = 3
      # Pub/Sub push, Cloud Scheduler and Cloud Tasks of this project count as internal.
      ingress = "ALLOW_INTERNAL_ONLY"
    }
    scan = {
      description       = "Drift, orphan, cost, rotation and reconcile scans, called by Cloud Scheduler."
      memory            = "1Gi"
      cpu               = "1"
      concurrency       = 1
      timeout           = 540
      max_instances     = 5
      store_connections = 2
      ingress           = "ALLOW_INTERNAL_ONLY"
    }
    dlq = {
      description       = "Lists and redrives dead-lettered jobs and callbacks, for operators."
      memory            = "512Mi"
      cpu               = "1"
      concurrency       = 1
      timeout           = 300
      max_instances     = 2
      store_connections = 2
      ingress           = "ALLOW_ALL"
    }
  }

  # Connections to the store at full scale-out, and what is kept free for
  # Cloud SQL's own sessions and an operator's psql.
  store_connections          = sum([for f in values(local.functions) : f.max_instances * f.store_connections])
  store_reserved_connections = 20

  # The KIDP_* settings every function reads (kidp.settings.Settings); the
  # store URL names each function's own database user, and the two keys come
  # from Secret Manager (functions.tf).
  environment = {
    KIDP_CLOUD                        = "gcp"
    KIDP_PROVIDER                     = "gcp"
    KIDP_REGION                       = var.region
    KIDP_GCP_PROJECT                  = var.project_id
    KIDP_QUEUE_URL                    = "pubsub://${var.project_id}/${google_pubsub_topic.jobs.name}"
    KIDP_GCP_DEAD_LETTER_TOPIC        = google_pubsub_topic.dead.id
    KIDP_GCP_DEAD_LETTER_SUBSCRIPTION = google_pubsub_subscription.dead.id
    KIDP_GCP_TASKS_QUEUE              = google_cloud_tasks_queue.delays.id
    KIDP_GCP_TASKS_SERVICE_ACCOUNT    = google_service_account.tasks.email
    KIDP_GCP_RUN_SERVICE_ACCOUNT      = google_service_account.services.email
    KIDP_JOB_MAX_DELIVERIES           = tostring(var.job_max_deliveries)
    KIDP_SECRET_STORE                 = "gcp"
    KIDP_CALLBACK_ALLOWLIST           = join(",", var.callback_allowlist)
    KIDP_TAG_PREFIX                   = var.tag_prefix
    KIDP_MANAGED_BY                   = var.managed_by
    KIDP_LOG_LEVEL                    = var.log_level
  }

  # postgresql+cloudsql://<iam-user>@/<database>?instance=<connection name>&max_connections=<cap>
  store_urls = {
    for name, function in local.functions : name => format(
      "postgresql+cloudsql://%s@/%s?instance=%s&max_connections=%d",
      urlencode(google_service_account.function[name].email),
      google_sql_database.store.name,
      google_sql_database_instance.store.connection_name,
      function.store_connections,
    )
  }

  # The broker's own resources whose names a provisioned one could share the
  # kidp- prefix with: IAM conditions (iam.tf) keep the admin roles off them.
  store_name    = "${var.name}-store"
  source_bucket = "${var.project_id}-${var.name}-function-source"
  logs_bucket   = "${var.project_id}-${var.name}-access-logs"

  # Google's own agents that act for this project's resources.
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
  tasks_agent  = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-cloudtasks.iam.gserviceaccount.com"

  # The scans Cloud Scheduler runs (kidp.scans.SCANS) and how often: the
  # KIDP_*_INTERVAL_SECONDS defaults; reconcile as often as a schedule can.
  scans = {
    drift     = "*/5 * * * *"
    orphans   = "7 * * * *"
    cost      = "17 3 * * *"
    rotation  = "43 3 * * *"
    reconcile = "* * * * *"
  }
}
