# The store: Cloud SQL for PostgreSQL, reached only through the Cloud SQL
# connector (mTLS, no authorized networks) with IAM database authentication:
# each function logs in as its own service account, and no password exists.
resource "google_sql_database_instance" "store" {
  name                = local.store_name
  region              = var.region
  database_version    = "POSTGRES_18"
  deletion_protection = var.deletion_protection

  settings {
    # Named, never left to Cloud SQL: from PostgreSQL 16 on it defaults to
    # Enterprise Plus, which refuses the db-custom-* tiers.
    edition           = "ENTERPRISE"
    tier              = var.database_tier
    availability_type = "REGIONAL"
    disk_autoresize   = true
    user_labels       = local.infra_labels

    ip_configuration {
      #checkov:skip=CKV_GCP_60:The connector reaches the public IP over mTLS with an ephemeral certificate and IAM login; no authorized networks exist, so nothing else can connect. A private IP would need a VPC connector for every function.
      ipv4_enabled = true
      ssl_mode     = "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"
    }

    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
      start_time                     = "02:00"

      backup_retention_settings {
        retained_backups = 14
      }
    }

    database_flags {
      name  = "cloudsql.iam_authentication"
      value = "on"
    }
    # Named, not left to the tier's default, so that the functions' pools are
    # counted against a known number (the precondition below).
    database_flags {
      name  = "max_connections"
      value = tostring(var.database_max_connections)
    }
    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_duration"
      value = "on"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }

    insights_config {
      query_insights_enabled = true
    }
  }

  lifecycle {
    precondition {
      condition     = local.store_connections + local.store_reserved_connections <= var.database_max_connections
      error_message = "The functions may open ${local.store_connections} connections to the store at full scale-out (max_instances x store_connections), plus ${local.store_reserved_connections} kept free: more than database_max_connections (${var.database_max_connections}). Raise it with database_tier, or lower max_instances or store_connections."
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_sql_database" "store" {
  name     = "kidp"
  instance = google_sql_database_instance.store.name
}

# Cloud SQL names a service account's database user by its email without
# ".gserviceaccount.com"; the connector does the same (kidp.stores.cloudsql).
resource "google_sql_user" "function" {
  for_each = local.functions
  name     = trimsuffix(google_service_account.function[each.key].email, ".gserviceaccount.com")
  instance = google_sql_database_instance.store.name
  type     = "CLOUD_IAM_SERVICE_ACCOUNT"
}
