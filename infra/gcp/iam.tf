# One service account per function, plus one per Google service that calls
# into the broker (Pub/Sub push, Cloud Scheduler, Cloud Tasks), each with only
# what its job needs. Every grant is on the resource it concerns, except the
# provider's roles and the Cloud SQL client roles, which IAM offers per
# project only.

resource "google_service_account" "function" {
  for_each     = local.functions
  account_id   = "${var.name}-${each.key}"
  display_name = "KIDP broker: the ${each.key} function"
  description  = each.value.description
}

resource "google_service_account" "tasks" {
  account_id   = "${var.name}-tasks"
  display_name = "KIDP broker: Cloud Tasks publishing delayed jobs"
}

resource "google_service_account" "push" {
  account_id   = "${var.name}-push"
  display_name = "KIDP broker: Pub/Sub pushing jobs to the jobs function"
}

resource "google_service_account" "scheduler" {
  account_id   = "${var.name}-scheduler"
  display_name = "KIDP broker: Cloud Scheduler calling the scan function"
}

# What the Cloud Run services the broker provisions run as
# (KIDP_GCP_RUN_SERVICE_ACCOUNT): an account with no roles, so a tenant's
# service gets no access of the broker's. Without it they would run as the
# project's default compute account, which the jobs function may not act as.
resource "google_service_account" "services" {
  account_id   = "${var.name}-services"
  display_name = "KIDP broker: the Cloud Run services it provisions"
  description  = "Runtime identity of provisioned Cloud Run services; holds no roles."
}

# ------------------------------------------------------------------ store

resource "google_project_iam_member" "sql_client" {
  for_each = local.functions
  project  = var.project_id
  role     = "roles/cloudsql.client"
  member   = google_service_account.function[each.key].member
}

resource "google_project_iam_member" "sql_login" {
  for_each = local.functions
  project  = var.project_id
  role     = "roles/cloudsql.instanceUser"
  member   = google_service_account.function[each.key].member
}

# ------------------------------------------------------------------ queue

# Every function enqueues (the api accepts, the jobs chain, the scans
# reconcile, the dlq redrives) and checks the topic in /health.
resource "google_pubsub_topic_iam_member" "jobs_publisher" {
  for_each = local.functions
  topic    = google_pubsub_topic.jobs.id
  role     = "roles/pubsub.publisher"
  member   = google_service_account.function[each.key].member
}

resource "google_pubsub_topic_iam_member" "jobs_viewer" {
  for_each = local.functions
  topic    = google_pubsub_topic.jobs.id
  role     = "roles/pubsub.viewer"
  member   = google_service_account.function[each.key].member
}

resource "google_pubsub_topic_iam_member" "tasks_publisher" {
  topic  = google_pubsub_topic.jobs.id
  role   = "roles/pubsub.publisher"
  member = google_service_account.tasks.member
}

# The jobs function dead-letters what it gives up on; the dlq function reads
# the dead-letter subscription and acknowledges what it redrives.
resource "google_pubsub_topic_iam_member" "dead_publisher" {
  topic  = google_pubsub_topic.dead.id
  role   = "roles/pubsub.publisher"
  member = google_service_account.function["jobs"].member
}

resource "google_pubsub_subscription_iam_member" "dead_reader" {
  subscription = google_pubsub_subscription.dead.id
  role         = "roles/pubsub.subscriber"
  member       = google_service_account.function["dlq"].member
}

# Pub/Sub's own agent moves messages to the dead-letter topic: it must publish
# there and read the subscription they leave.
resource "google_pubsub_topic_iam_member" "agent_dead_publisher" {
  topic  = google_pubsub_topic.dead.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "agent_jobs_subscriber" {
  subscription = google_pubsub_subscription.jobs.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# ------------------------------------------------------------ delayed jobs

resource "google_cloud_tasks_queue_iam_member" "enqueuer" {
  for_each = local.functions
  name     = google_cloud_tasks_queue.delays.id
  location = var.region
  role     = "roles/cloudtasks.enqueuer"
  member   = google_service_account.function[each.key].member
}

resource "google_cloud_tasks_queue_iam_member" "viewer" {
  for_each = local.functions
  name     = google_cloud_tasks_queue.delays.id
  location = var.region
  role     = "roles/cloudtasks.viewer"
  member   = google_service_account.function[each.key].member
}

# A task that carries the tasks account's token may be created only by those
# who may act as it: on that account, not on the project.
resource "google_service_account_iam_member" "act_as_tasks" {
  for_each           = local.functions
  service_account_id = google_service_account.tasks.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.function[each.key].member
}

# Deploying a Cloud Run service that runs as an account needs
# iam.serviceAccounts.actAs on that account: the jobs function may act as the
# services' account, and as no other (not the functions' own).
resource "google_service_account_iam_member" "jobs_act_as_services" {
  service_account_id = google_service_account.services.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.function["jobs"].member
}

# Google's agents mint the tokens of the accounts they call as (older
# projects do not grant this by themselves).
resource "google_service_account_iam_member" "tasks_agent_token" {
  service_account_id = google_service_account.tasks.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.tasks_agent
}

resource "google_service_account_iam_member" "pubsub_agent_token" {
  service_account_id = google_service_account.push.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_agent
}

# ------------------------------------------------------------------ secrets

resource "google_secret_manager_secret_iam_member" "keys" {
  for_each = {
    for pair in setproduct(keys(local.functions), ["jwt", "callback"]) :
    "${pair[0]}-${pair[1]}" => { function = pair[0], secret = pair[1] }
  }
  secret_id = google_secret_manager_secret.key[each.value.secret].id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.function[each.value.function].member
}

# The deployments' credentials live in secrets named kidp_<namespace>_<name>-credentials
# (kidp.secrets.gcpsecretmanager). The jobs function creates, reads and
# deletes them. A secret's creation is checked on the project, so creating is
# allowed there; everything else only on kidp_ secrets.
resource "google_project_iam_member" "credentials_admin" {
  project = var.project_id
  role    = "roles/secretmanager.admin"
  member  = google_service_account.function["jobs"].member

  condition {
    title       = "kidp-credentials-only"
    description = "Creating secrets, and only the secrets the broker names kidp_*"
    expression  = "resource.type == \"cloudresourcemanager.googleapis.com/Project\" || resource.name.startsWith(\"projects/${data.google_project.this.number}/secrets/kidp_\")"
  }
}

# The scan function rotates them: it reads the current value and adds a version.
resource "google_project_iam_member" "credentials_rotation" {
  for_each = toset(["roles/secretmanager.secretAccessor", "roles/secretmanager.secretVersionAdder"])
  project  = var.project_id
  role     = each.value
  member   = google_service_account.function["scan"].member

  condition {
    title       = "kidp-credentials-only"
    description = "Only the secrets the broker names kidp_*"
    expression  = "resource.name.startsWith(\"projects/${data.google_project.this.number}/secrets/kidp_\")"
  }
}

# ---------------------------------------------------------------- provider

# Cloud SQL and Cloud Storage take IAM conditions on a resource's name: a
# grant of their admin roles reaches the kidp-* instances and buckets the
# broker provisions (kidp.providers.gcp names them so), never the broker's own
# store and buckets, even where a name of theirs starts with kidp- too.
# Everything that is not an instance or a bucket (the project, where creating
# and listing are checked) stays allowed.
#
# Pub/Sub, Memorystore and Cloud Run do not evaluate resource names in
# conditions (only the services of Google's "resource attributes for IAM
# Conditions" list do), so roles/pubsub.editor and roles/run.developer reach
# the broker's own topics and the functions' Cloud Run services; see the README.
locals {
  sql_instances = "projects/${var.project_id}/instances/"

  provider_conditions = {
    "roles/cloudsql.admin" = {
      title       = "kidp-instances-only"
      description = "Cloud SQL instances named kidp-*, not the broker's store"
      expression  = local.sql_condition
    }
    "roles/storage.admin" = {
      title       = "kidp-buckets-only"
      description = "Buckets named kidp-*, not the broker's own"
      expression  = local.storage_condition
    }
  }

  sql_condition = <<-EOT
    !resource.name.startsWith("${local.sql_instances}") ||
    (resource.name.startsWith("${local.sql_instances}kidp-") &&
    resource.name != "${local.sql_instances}${local.store_name}" &&
    !resource.name.startsWith("${local.sql_instances}${local.store_name}/"))
  EOT

  storage_condition = <<-EOT
    !resource.name.startsWith("projects/_/buckets/") ||
    (resource.name.startsWith("projects/_/buckets/kidp-") &&
    resource.name != "projects/_/buckets/${local.source_bucket}" &&
    !resource.name.startsWith("projects/_/buckets/${local.source_bucket}/") &&
    resource.name != "projects/_/buckets/${local.logs_bucket}" &&
    !resource.name.startsWith("projects/_/buckets/${local.logs_bucket}/"))
  EOT
}

resource "google_project_iam_member" "provider" {
  for_each = {
    for pair in flatten([
      for function, roles in var.provider_roles : [
        for role in roles : { function = function, role = role }
      ]
    ]) : "${pair.function} ${pair.role}" => pair
  }
  project = var.project_id
  role    = each.value.role
  member  = google_service_account.function[each.value.function].member

  dynamic "condition" {
    for_each = contains(keys(local.provider_conditions), each.value.role) ? [local.provider_conditions[each.value.role]] : []
    content {
      title       = condition.value.title
      description = condition.value.description
      expression  = condition.value.expression
    }
  }
}

# Drift and orphan scans read buckets' metadata and list them:
# roles/storage.objectViewer has neither storage.buckets.get nor .list (a 403
# on a bucket of ours would read as somebody else's bucket), and the api and
# scan need no object.
resource "google_project_iam_custom_role" "bucket_reader" {
  project     = var.project_id
  role_id     = "${replace(var.name, "-", "_")}_bucket_reader"
  title       = "KIDP broker: bucket reader"
  description = "Reads and lists buckets' metadata, no objects (drift and orphan scans)."
  permissions = ["storage.buckets.get", "storage.buckets.list"]
}

resource "google_project_iam_member" "bucket_reader" {
  for_each = toset(["api", "scan"])
  project  = var.project_id
  role     = google_project_iam_custom_role.bucket_reader.name
  member   = google_service_account.function[each.key].member
}

# The rotation scan sets a new password on a Cloud SQL instance's built-in
# user (users.update): roles/cloudsql.editor cannot change users. Held to the
# instances the broker provisions.
resource "google_project_iam_custom_role" "sql_rotation" {
  project     = var.project_id
  role_id     = "${replace(var.name, "-", "_")}_sql_rotation"
  title       = "KIDP broker: Cloud SQL password rotation"
  description = "Reads an instance and sets its users' passwords (the rotation scan)."
  permissions = ["cloudsql.instances.get", "cloudsql.users.list", "cloudsql.users.update"]
}

resource "google_project_iam_member" "sql_rotation" {
  project = var.project_id
  role    = google_project_iam_custom_role.sql_rotation.name
  member  = google_service_account.function["scan"].member

  condition {
    title       = "kidp-instances-only"
    description = "Cloud SQL instances named kidp-*, not the broker's store"
    expression  = local.sql_condition
  }
}

# ---------------------------------------------------------------- invokers

resource "google_cloud_run_v2_service_iam_member" "api" {
  for_each = toset(var.api_invokers)
  name     = google_cloudfunctions2_function.function["api"].service_config[0].service
  location = var.region
  role     = "roles/run.invoker"
  member   = each.value
}

resource "google_cloud_run_v2_service_iam_member" "jobs" {
  name     = google_cloudfunctions2_function.function["jobs"].service_config[0].service
  location = var.region
  role     = "roles/run.invoker"
  member   = google_service_account.push.member
}

resource "google_cloud_run_v2_service_iam_member" "scan" {
  name     = google_cloudfunctions2_function.function["scan"].service_config[0].service
  location = var.region
  role     = "roles/run.invoker"
  member   = google_service_account.scheduler.member
}

resource "google_cloud_run_v2_service_iam_member" "dlq" {
  for_each = toset(var.operators)
  name     = google_cloudfunctions2_function.function["dlq"].service_config[0].service
  location = var.region
  role     = "roles/run.invoker"
  member   = each.value
}
